"""Everything with time and I/O: tasks, simulator, DHT, gRPC, rounds and the CLI."""
