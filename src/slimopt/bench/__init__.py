"""The benchmark harness behind ``slimopt bench``; the library never imports it.

It reads like one training script split by concern:

* ``data``      text -> tokens -> a fixed train/validation split -> batches
* ``model``     a LLaMA-style decoder with Hugging Face parameter names, presets tiny ... 1b
* ``baselines`` one factory for our optimizers and the baselines (skipped with a note when missing)
* ``train``     the loop: warm-up + cosine, clipping, bf16 autocast on GPU, measurements
* ``report`` / ``plots``  results.json with machine, versions, commit and command line; report.md; PNGs

Tasks (each a module with ``add_arguments`` and ``run``): ``pretrain``, ``finetune``, ``memory``,
``throughput`` (optimizer step time) and ``rosenbrock`` (Top-K with and without error feedback).
"""
