import json

from conftest import FIXTURES


def test_inspect_mlp_json(cli):
    r = cli("inspect", FIXTURES / "mlp.pt2", "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["total_parameters"] == 16 * 32 + 32 + 32 * 24 + 24 + 24 * 4 + 4
