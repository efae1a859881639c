"""API fuzzing from the service's own OpenAPI schema (schemathesis), in process: every
operation gets generated valid and invalid requests (examples, boundary coverage and
random fuzzing, bounded), and every answer must be free of 5xx and match the documented
status codes and response schemas (ErrorBody for every refusal). The NAMD model is a
fake that answers instantly; the CLDM routes run a tiny random CLDM bundle (called
directly: schemathesis runs each call on its own event loop); cohort jobs go to a fake
job client."""

import atexit
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import schemathesis
from cldm_fixtures import write_tiny_bundle
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from serving_fakes import CFG, SIDE, FakeDeployment, FakeJobs

from cohortcast.config import IngestConfig
from cohortcast.models.cldm_bundle import CLDMBundle
from cohortcast.serving.cldm_model import run_cldm_batch
from cohortcast.serving.local import local_app

pytestmark = pytest.mark.timeout(300)

ROOT = Path(tempfile.mkdtemp(prefix="cohortcast-fuzz-"))
atexit.register(shutil.rmtree, ROOT, True)
(ROOT / "cohort").mkdir()
(ROOT / "cohort" / "card.json").write_text(json.dumps({}))


class DirectCLDM:
    """The CLDM deployment without `@serve.batch` (its queue keeps to one event loop)."""

    def __init__(self, bundle: CLDMBundle):
        self.bundle = bundle

    def info(self):
        return self.bundle.info()

    def forecast(self, item):
        return run_cldm_batch(self.bundle, [item])[0]


def _app():
    app = local_app(
        FakeDeployment(),
        replace(
            CFG, cohort_roots=[str(ROOT)], cohort_output=str(ROOT / "out"), max_upload_mb=1.0, max_uncompressed_mb=4.0
        ),
        ingest=IngestConfig(crop_size=SIDE, crop_spacing_mm=1.5),
        cldm=DirectCLDM(CLDMBundle.load(write_tiny_bundle(ROOT / "cldm"))),
    )
    app.state.api._jobs = FakeJobs()
    return app


schema = schemathesis.openapi.from_asgi("/openapi.json", _app(), config=schemathesis.Config.from_dict({"seed": 13}))


def test_every_refusal_is_documented_with_its_body():
    spec = json.loads(json.dumps(schema.raw_schema))
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if path == "/healthz":
                continue
            refusals = [code for code in operation["responses"] if code.startswith(("4", "5"))]
            assert refusals, f"{method.upper()} {path} documents no error answers"
            for code in refusals:
                body = operation["responses"][code]["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/ErrorBody"}, (path, code)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx_and_matches_its_schema(case):
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance, response_schema_conformance])
