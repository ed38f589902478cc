"""The DICOM receiver's container healthcheck (`xrayq healthcheck dicom`): a C-ECHO from the
receiver's own loopback address as XRAYQ-HEALTH gets in whatever the allow-list says (compose's lists
name modality networks, never the container's loopback) -- and may only echo: the same title stores
nothing, and from any other address it is a stranger."""

from __future__ import annotations

import os
import subprocess
import sys

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from loadtest.harness.processes import ROOT, stop_process
from services.dicom.peers import HEALTH_CHECK_AE_TITLE
from tests.security.dicom_receivers import CALLED, associate, running_receiver

pytestmark = pytest.mark.integration
# Only a site at 127.0.0.2: the receiver's own 127.0.0.1 is on no entry.
ALLOW_LIST = "CT-B@127.0.0.2/32:org-b"


def healthcheck_dicom(port: int) -> subprocess.CompletedProcess[str]:
    env = {"XRAYQ_DICOM_HOST": "0.0.0.0", "XRAYQ_DICOM_PORT": str(port), "XRAYQ_DICOM_AE_TITLE": CALLED}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "healthcheck", "dicom"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_healthcheck_echoes_but_cannot_store_or_come_from_elsewhere(
    services_env, services_settings, tmp_path_factory, data_dir
) -> None:
    env = {**services_env, "XRAYQ_DICOM_ALLOWED_AE_TITLES": ALLOW_LIST}
    with running_receiver(env, tmp_path_factory, probe=HEALTH_CHECK_AE_TITLE) as receiver:
        healthy = healthcheck_dicom(receiver.port)
        assert healthy.returncode == 0, healthy.stderr
        assert healthy.stdout.strip() == f"dicom: C-ECHO answered by {CALLED}@127.0.0.1:{receiver.port}"

        # Another title from loopback is still rejected; the health title from another address is closed.
        assert associate(receiver, calling="MODALITY").is_rejected
        elsewhere = associate(receiver, calling=HEALTH_CHECK_AE_TITLE, source="127.0.0.3")
        assert not elsewhere.is_established and not elsewhere.is_rejected

        instance = pydicom.dcmread(data_dir / "dicom" / "RG1_UNCR.dcm")
        contexts = (
            (instance.SOPClassUID, instance.file_meta.TransferSyntaxUID),
            (instance.SOPClassUID, ExplicitVRLittleEndian),
        )
        store = associate(receiver, calling=HEALTH_CHECK_AE_TITLE, contexts=contexts)
        assert store.is_established
        status = store.send_c_store(instance)
        store.release()
        assert int(status.Status) == 0x0124  # Refused: Not Authorized
        assert "dicom_sender_not_allowed" in str(status.ErrorComment)
        stop_process(receiver.process)
        down = healthcheck_dicom(receiver.port)
        assert down.returncode == 1 and "no association" in down.stderr
