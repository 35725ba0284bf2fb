"""A teacher on another machine: ``opd-teacher serve`` ships its final hidden states and, once, its lm_head;
the student side computes the exact full-vocabulary loss with the fused ops (docs/serving.md).

    from opd_kernels import hf
    from opd_kernels.teacher import RemoteTeacher
    teacher = RemoteTeacher("http://127.0.0.1:8000", token=open("token").read().strip())
    loss = hf.distillation_loss(student, teacher, input_ids, attention_mask=mask, loss_mask=completion)

The server needs the ``serve`` extra (aiohttp); the client only the standard library.
"""
from .client import (LocalTeacher, RemoteTeacher, TeacherError, TeacherFingerprintError, TeacherRequestError,
                     TeacherUnavailableError, is_teacher)
from .engines import SGLangTeacher, VLLMTeacher
from .wire import fingerprint

__all__ = ["RemoteTeacher", "LocalTeacher", "TeacherError", "TeacherUnavailableError", "TeacherRequestError",
           "TeacherFingerprintError", "is_teacher", "fingerprint", "SGLangTeacher", "VLLMTeacher"]
