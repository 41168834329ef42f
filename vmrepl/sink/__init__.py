"""The destination: received snapshots become qcow2 layers of per-disk chains (`layer`), catalogued (`store`)."""
