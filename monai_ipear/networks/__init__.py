from .blocks import *  # noqa: F401,F403
from .nets import IIRPNet, PyramidRegistrationNet, RPNet, iPEAR
from .nets import IIRPCheckpointError, IterativeRegistration, convert_iirp_state_dict, iirp_key_map, load_iirp_checkpoint
from .utils import check_registration_pair
from .nets import RAN, SACBNet, SMGICNet
