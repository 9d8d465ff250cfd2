#!/bin/sh
# Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d): one database per service.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<-EOSQL
	CREATE DATABASE prefect;
	CREATE DATABASE mlflow;
EOSQL
# Prefect's search indexes use trigram matching (Prefect docs: PostgreSQL >= 14.9 with pg_trgm).
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname prefect -c "CREATE EXTENSION IF NOT EXISTS pg_trgm;"
