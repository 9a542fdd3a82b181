"""The embedded DuckDB warehouse: versioned tables with lineage, and the run registry the dashboard reads."""

from recsys.warehouse.store import TableVersion, Warehouse, WarehouseError

__all__ = ["TableVersion", "Warehouse", "WarehouseError"]
