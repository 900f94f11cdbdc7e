# Copyright (c) MONAI Consortium
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Model Zoo unit test of the ``ipear_registration`` bundle: ``ci/unit_tests/test_ipear_registration.py``.

Run from the Model Zoo checkout's root (the bundle unpacked in ``models/ipear_registration``) as the zoo's runner
does. Train on tiny synthetic pairs, evaluate (``evaluate.json`` layered on ``train.json``) and infer on tiny NIfTI
files listed in a datalist, each through ``check_workflow`` with the property checks. Evaluation reads the bundle's
``models/model.pt``, which the zoo's ``ci/verify_bundle.py`` downloads (``large_files.yml``) before the unit tests
run; inference does not load weights (``handlers#0`` disabled). CPU only, under a minute.
"""

import json
import os
import shutil
import tempfile
import unittest

import nibabel as nib
import numpy as np
from monai.bundle import ConfigWorkflow
from utils import check_workflow

BUNDLE_ROOT = "models/ipear_registration"
TINY = {"bundle_root": BUNDLE_ROOT, "device": "$torch.device('cpu')", "synthetic#spatial_size": 16,
        "synthetic#num_labels": 2}


def _workflow(workflow_type, configs, **override):
    files = [os.path.join(BUNDLE_ROOT, "configs", c) for c in configs]
    return ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=files if len(files) > 1 else files[0],
        logging_file=os.path.join(BUNDLE_ROOT, "configs/logging.conf"),
        meta_file=os.path.join(BUNDLE_ROOT, "configs/metadata.json"),
        **override,
    )


class TestIPEARRegistration(unittest.TestCase):
    def setUp(self):
        self.dataset_dir = tempfile.mkdtemp()
        rng = np.random.default_rng(0)
        grid = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"))
        subjects = []
        for s in range(3):  # a bright blob on a dim background, moved a little per subject; labels: blob and rim
            centre = 7.5 + rng.uniform(-1.5, 1.5, size=(3, 1, 1, 1))
            radius = np.sqrt(((grid - centre) ** 2).sum(0))
            image = (np.exp(-(radius / 5.0) ** 2) + 0.05 * rng.random((16, 16, 16))).astype(np.float32)
            label = ((radius < 3.5).astype(np.uint8) + (radius < 6.0)).astype(np.uint8)
            affine = np.diag([2.0, 2.0, 2.0, 1.0])
            for kind, array in (("image", image), ("label", label)):
                nib.save(nib.Nifti1Image(array, affine), os.path.join(self.dataset_dir, f"s{s}_{kind}.nii.gz"))
            subjects.append({"image": f"s{s}_image.nii.gz", "label": f"s{s}_label.nii.gz"})
        self.datalist = os.path.join(self.dataset_dir, "dataset.json")
        with open(self.datalist, "w") as f:
            json.dump({"training": subjects, "validation": subjects[:2]}, f)
        self.out_dir = tempfile.mkdtemp()

    def tearDown(self):
        shutil.rmtree(self.dataset_dir)
        shutil.rmtree(self.out_dir)

    def test_1_train_config(self):
        override = {**TINY, "num_train_pairs": 2, "num_val_pairs": 1, "max_epochs": 1, "ckpt_dir": self.out_dir,
                    "output_dir": os.path.join(self.out_dir, "runs")}
        check_workflow(_workflow("train", ["train.json"], **override), check_properties=True)
        self.assertTrue(any(n.startswith("model") and n.endswith(".pt") for n in os.listdir(self.out_dir)))

    def test_2_eval_config(self):
        # the zoo's pattern: evaluate.json layered on train.json, run as a "train" workflow
        override = {**TINY, "dataset_dir": self.dataset_dir, "datalist": self.datalist, "split": "validation",
                    "output_dir": self.out_dir, "surface_metrics": False}
        check_workflow(_workflow("train", ["train.json", "evaluate.json"], **override), check_properties=True)
        self.assertTrue(os.path.isfile(os.path.join(self.out_dir, "metrics.csv")))

    def test_3_infer_config(self):
        override = {**TINY, "dataset_dir": self.dataset_dir, "datalist": self.datalist, "split": "validation",
                    "output_dir": self.out_dir, "handlers#0#_disabled_": True}
        check_workflow(_workflow("infer", ["inference.json"], **override), check_properties=True)
        written = os.listdir(self.out_dir)
        for suffix in ("_warped.nii.gz", "_ddf.nii.gz", "_ddf_itk.nii.gz"):
            self.assertTrue(any(n.endswith(suffix) for n in written), f"no *{suffix} in {written}")


if __name__ == "__main__":
    unittest.main()
