"""Ray-free data formats and storage: dataset sources (one module per loader family), the
canonical Parquet image set, training checkpoints, model files, and paths that are local
directories or pyarrow filesystems (s3://, gs://)."""
