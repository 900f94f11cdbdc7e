from .checkpoint import AtomicCheckpointSaver, ResumeCheckpointLoader, find_resume_checkpoint
from .evaluation import RegistrationMetricsWriter, summarize_rows
from .iteration import RegistrationEvalIteration, RegistrationTrainIteration
from .outputs import RegistrationOutputWriter, ddf_to_mm
from .preflight import TrainingRunLock, as_bool, check_training_setup
from .tensorboard import RegistrationImageLogger, ddf_colour_map
from .levelwise import LevelwiseTraining
