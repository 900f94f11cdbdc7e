from .ipear import iPEAR
from .pyramid import PyramidRegistrationNet, use_channels_last, use_reference_paths
from .rpnet import IIRPNet, RPNet
from .iterative import IterativeRegistration
from .pretrained import IIRPCheckpointError, convert_iirp_state_dict, iirp_key_map, load_iirp_checkpoint
from .sacbnet import SACBEncoder, SACBHead, SACBLevelDecoder, SACBNet
from .ran import RAN
from .smgicnet import SMGICLevel, SMGICNet
