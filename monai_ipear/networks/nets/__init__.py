from .ipear import iPEAR
from .pyramid import PyramidRegistrationNet
from .rpnet import IIRPNet, RPNet
