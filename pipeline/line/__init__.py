"""The production line: ELPV cells, camera/product faults, the line simulator."""
