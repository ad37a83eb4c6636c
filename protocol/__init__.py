"""The wire: protobuf messages, framing, integrity and signatures. No training logic."""
