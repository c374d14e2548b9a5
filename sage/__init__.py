"""SAGE, the edge runtime around a served HRM model: shared-memory mailboxes (sage.mailbox: PBM records,
sage.ftm: tensors by descriptor), the serving process built on them (sage.serve, sage.client), and the learning
side (sage.salience, sage.experience, sage.fast_memory, sage.sleep). Imports numpy and the standard library only;
JAX or torch are imported only by the backend or command that needs them."""
