"""Local lmms-eval tasks (offline data): :mod:`.local` writes them and its functions read them.

lmms-eval's ``LMMS_EVAL_PLUGINS`` route scans a plugin's ``tasks`` package for task YAMLs; this
one ships none (a local task points at its own data files, so it is written per data set with
:func:`pio_kernels.eval.tasks.local.write_task`).
"""
