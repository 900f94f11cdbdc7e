from .datalist import load_registration_pairs, pair_name
from .synthetic import SyntheticPairGenerator, SyntheticRegistrationDataset
from .transforms import registration_pair_transforms
