from .jacobian import displacement_gradient, folding_percentage, jacobian_determinant
from .pairwise import label_overlap_metrics, pair_registration_metrics
