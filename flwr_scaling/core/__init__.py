"""The math: scaling rules, the local training loop, the server-side update, models. No Flower, no I/O."""
