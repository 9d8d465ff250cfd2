"""The image catalog: content store, Parquet tables, snapshots, ingestion."""
