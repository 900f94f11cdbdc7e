from .ipear import iPEAR
from .pyramid import PyramidRegistrationNet
from .rpnet import IIRPNet, RPNet
from .iterative import IterativeRegistration
from .pretrained import IIRPCheckpointError, convert_iirp_state_dict, iirp_key_map, load_iirp_checkpoint
