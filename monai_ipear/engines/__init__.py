from .checkpoint import AtomicCheckpointSaver, ResumeCheckpointLoader
from .evaluation import RegistrationMetricsWriter, summarize_rows
from .iteration import RegistrationEvalIteration, RegistrationTrainIteration
from .outputs import RegistrationOutputWriter, ddf_to_mm
from .tensorboard import RegistrationImageLogger, ddf_colour_map
from .levelwise import LevelwiseTraining
