"""Data lineage: consumed-sample ranges, their keys, and the check a downstream team runs."""

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
