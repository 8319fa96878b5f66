"""The optimizers, one module per method (``microadam``, ``adam_mini``, ``sinkgd``, ``swan``) and the
hybrid base that SinkGD and SWAN share (``hybrid``: a matrix update for hidden matrices, AdamW for the
rest). Each ``step`` reads like its paper's algorithm box and calls the kernels in ``slimopt.ops``.
Classes are imported on first use; ``slimopt.registry`` says which module holds which."""
