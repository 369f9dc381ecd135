"""Cold-start data synthesis: a teacher model solves questions with our tools, verified
trajectories become SFT records."""

from deepeyes.synth.synthesize import DROP_REASONS, KEPT, run_synthesis, summarize
from deepeyes.synth.teacher import ChatJudge, TeacherClient, TeacherEngine, TeacherError, TeacherRefused

__all__ = [
    "DROP_REASONS", "KEPT", "ChatJudge", "TeacherClient", "TeacherEngine", "TeacherError", "TeacherRefused",
    "run_synthesis", "summarize",
]
