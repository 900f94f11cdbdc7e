from .registration import RegistrationLoss
