"""The benchmark harness behind ``slimopt bench``; the library never imports it.

It reads like one training script split by concern:

* ``data``      text -> tokens -> a fixed train/validation split -> batches
* ``model``     a LLaMA-style decoder with Hugging Face parameter names, presets tiny ... 1b
* ``baselines`` one factory for our optimizers and the baselines (skipped with a note when missing)
* ``train``     the loop: warm-up + cosine, clipping, bf16 autocast on GPU, measurements
* ``report`` / ``plots``  results.json (one record per line) with machine, versions, commit and command line;
  report.md; PNGs
* ``progress`` / ``comparison``  a comparison's progress bars; its summary, report and merge (pretrain)
* ``torchrun``  ``--nproc``: data-parallel workers through torchrun; ``kernel_count``: launches of one step

Tasks (each a module with ``add_arguments`` and ``run``): ``pretrain``, ``finetune``, ``finetune_lm``,
``memory_check``, ``throughput`` (optimizer step time), ``rosenbrock`` (Top-K with and without error
feedback), ``gpu_estimate`` and ``triton_check``. Without ``--optimizers`` a task compares every registered
optimizer (``slimopt.registry.default_names``).
"""
