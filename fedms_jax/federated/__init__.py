"""The federated simulation engine: placement, client updates, server aggregation."""
