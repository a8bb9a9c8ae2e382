"""User text: reading a corpus (sources), token shards (shards), bits per byte (bpb)."""
