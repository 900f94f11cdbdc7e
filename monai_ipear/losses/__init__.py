from .registration import REGULARIZATIONS, GradientSmoothnessLoss, RegistrationLoss
from .smgicnet import (
    FieldSmoothnessLoss,
    GradICONLoss,
    InverseConsistencyLoss,
    MultiLevelNCCLoss,
    SMGICNetLoss,
    SymmetricConsistencyLoss,
    composed_displacement,
)
