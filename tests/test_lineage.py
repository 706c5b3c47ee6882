"""Data lineage: consumed-sample ranges, their keys, and the check a downstream team runs."""

import pytest

def test_lineage_ranges_merge_and_resolve_to_keys(xray_shards):
    from data_pipeline.lineage import Lineage, shard_keys
    from data_pipeline.shards import resolve_shards

    url = resolve_shards(xray_shards).urls[0]
    lineage = Lineage()
    lineage.add_batch([url] * 4, [5, 3, 4, 0])
    assert lineage.to_dict() == {url: [[0, 1], [3, 6]]} and lineage.count == 4
    other = Lineage({url: [[1, 3]]})
    lineage.update(other)
    assert lineage.to_dict() == {url: [[0, 6]]}
    names = shard_keys(url)
    assert len(names) == 8 and lineage.keys()[url] == names[:6]


def test_lineage_lists_consumed_patients_and_the_check_takes_raw_or_hashed_ids(tmp_path):
    """Two real DICOMs (patients 1CT1 and 4MR1) as X-ray shards; a run that consumed only the first
    sample names only its patient, and `lineage check --by patient` flags its raw id or its hash."""
    import json
    import shutil

    import pydicom
    from pydicom.data import get_testdata_file

    from data_pipeline.lineage import Lineage, seen_keys
    from data_pipeline.shards import resolve_shards
    from data_pipeline.writers import write_xray_shards
    from data_pipeline.xray_io import hash_identifier

    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), raw / name)
    write_xray_shards(str(raw), str(tmp_path / "shards"), 8, progress=False)
    (url,) = resolve_shards(str(tmp_path / "shards")).urls
    lineage = Lineage()
    lineage.add(url, 0)
    manifest = lineage.manifest()
    first = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert manifest["identities"]["patient"] == [hash_identifier(first.PatientID)]
    assert manifest["identities"]["source"] == ["CT_small.dcm"] and manifest["samples_consumed"] == 1
    assert "1CT1" not in json.dumps(manifest)  # raw ids never leave the shards
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "lineage.json").write_text(json.dumps(manifest))
    (tmp_path / "patients.txt").write_text("4MR1\n1CT1\n")
    (tmp_path / "hashes.txt").write_text(hash_identifier("1CT1") + "\n")
    (tmp_path / "others.txt").write_text("4MR1\nPAT-999\n")
    assert seen_keys(str(bundle), str(tmp_path / "patients.txt"), by="patient") == (["1CT1"], 2)
    assert seen_keys(str(bundle), str(tmp_path / "hashes.txt"), by="patient") == ([hash_identifier("1CT1")], 1)
    assert seen_keys(str(bundle), str(tmp_path / "others.txt"), by="patient") == ([], 2)
    (bundle / "lineage.json").write_text(json.dumps({"keys": manifest["keys"]}))  # an export from before
    with pytest.raises(ValueError, match="has no patient identities"):
        seen_keys(str(bundle), str(tmp_path / "patients.txt"), by="patient")
