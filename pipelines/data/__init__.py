"""Raw corpus -> validated, cleaned, split, versioned Parquet shards with a manifest, and Ray Data readers of them."""
