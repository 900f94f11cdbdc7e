from .datalist import load_registration_pairs, pair_name
from .synthetic import SyntheticPairGenerator, SyntheticRegistrationDataset
from .transforms import SameGridCheckd, registration_pair_transforms
