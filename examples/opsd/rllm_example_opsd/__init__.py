"""On-policy self-distillation on the arith task: the workflow that carries a teacher context.

See ``examples/opsd/config.yaml`` and ``docs/hooks_opsd.md``.
"""

from rllm_example_opsd.workflow import arith_opsd_workflow, teacher_messages

__all__ = ["arith_opsd_workflow", "teacher_messages"]
