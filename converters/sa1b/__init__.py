"""The ``sa1b`` dataset kind: SA-1B TAR shards (JPEG + JSON [+ features NPZ]) into a store."""
