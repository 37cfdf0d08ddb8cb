"""The bucket: the S3 client (the only code that talks to S3), key names, listings, the lease and deletion records."""
