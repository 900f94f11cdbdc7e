from .blocks import *  # noqa: F401,F403
from .nets import IIRPNet, PyramidRegistrationNet, RPNet, iPEAR
from .utils import check_registration_pair
