from .encoders import ConvEncoder, ConvGELUBlock, FeaturePyramidEncoder, NABlock, NAEncoder
from .farm import FARM, ResidualPathway, ResidualPathwayUnit, FARMSpatialAttention, SqueezeExcitationBlock
from .fields import FieldComposer, crop_to, pad_to_divisible, resize_ddf
from .flow_estimator import ResidualFlowEstimator
from .neighborhood_attention import NeighborhoodAttention, natten_available, neighborhood_indices
from .sacb import MatchingFlowEstimator, SpatialAwareConvBlock, kmeans, neighbourhood_offsets
from .residual_aligner import MotionAwareBlock, RASharedConvs, ResidualAligner, SampleNorm, boundary_limit, expand_heads
