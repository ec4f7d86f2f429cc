"""PQA: product quantization in DNN hardware acceleration (AbouElhamayed et al., TRETS 2024).

    from effllm_lib.pq import PQConfig, pq_convert_, calibrate_, finetune_
    pq_convert_(model, PQConfig(n_prototypes=16, subvec_len=9))   # Conv2d/Linear -> PQConv2d/PQLinear
    calibrate_(model, images)                                    # k-means prototypes from real activations
    finetune_(model, (images, labels), mode="both")              # LUT / prototypes / both, soft assignment

Modules: ``layers`` (PQ layers, low-bit tables, conversion), ``train`` (k-means, calibration, fine-tuning,
float training), ``golden`` (integer datapath model), ``accelerator`` (analytical PQA and DLA cycle/area
model), ``cnn`` (ResNet-20, KWS and EMNIST shapes; Fashion-MNIST / CIFAR-10 loading), ``sweeps`` (the
accuracy experiments of the chapter), ``fast`` (a vectorized CPU inference path).
"""

from .layers import PQConfig, PQConv2d, PQLinear, pq_convert_, pq_layers, set_bits_, set_forward_, set_tau_
from .train import accuracy, calibrate_, finetune_, kmeans, layer_mse, train_float

__all__ = ["PQConfig", "PQConv2d", "PQLinear", "pq_convert_", "pq_layers", "set_bits_", "set_forward_", "set_tau_",
           "accuracy",
           "calibrate_", "finetune_", "kmeans", "layer_mse", "train_float"]
