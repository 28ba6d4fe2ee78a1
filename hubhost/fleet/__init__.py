"""Fleet mode: many hubs on one Redis or Redis Cluster (DESIGN section 8)."""
