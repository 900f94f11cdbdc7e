from .registration import REGULARIZATIONS, GradientSmoothnessLoss, RegistrationLoss
from .smgicnet import (
    FieldSmoothnessLoss,
    GradICONLoss,
    InverseConsistencyLoss,
    MultiLevelConsistencyLoss,
    MultiLevelNCCLoss,
    SMGICNetLoss,
    SymmetricConsistencyLoss,
    composed_displacement,
)
from .ran import EdgeAwareSmoothnessLoss, MaskedLNCCLoss, RANLoss
