"""SAGE, the edge runtime: shared-memory mailboxes (sage.mailbox: PBM records, sage.ftm: tensors by
descriptor) and the serving process built on them. Imports numpy and the standard library only;
JAX is never imported at import time."""
