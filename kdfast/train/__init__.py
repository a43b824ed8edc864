"""kdfast's training stack, built on the public loss API (``import kdfast``) only.

- ``trainer``: DistillTrainer, the training loop (one process, or DDP under torchrun);
- ``lm``: running a student/teacher pair of language models through the loss, choosing
  the fused-linear or the logits path, and held-out evaluation;
- ``data``: token windows in a resumable, DDP-exact order; ``corpus``: the demo's text
  files and tokenizer;
- ``teacher_cache``: a teacher's top-k or sampled log-probs captured once into verified shards,
  and read back to train from;
- ``checkpoint``: atomic, verified checkpoints; ``runtime``: process group, device, peak
  memory, metrics log, progress bar;
- ``models``: a small GPT; ``config``: YAML configs to objects; ``cli`` and ``demo``: the
  ``kdfast`` command and its ``demo`` job.
"""
