"""Data: sources, federated splits, partitioners, plots of partitions."""
