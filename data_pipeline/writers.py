"""The shard writers behind ``pretrain shards <kind>``: kind -> ``writer(src, out, samples_per_shard, progress, labels)``."""
from data_pipeline.ct_io import write_ct_shards
from data_pipeline.video_io import write_video_shards
from data_pipeline.write_shards import write_tile_shards, write_xray_shards
from data_pipeline.wsi_io import write_wsi_shards

WRITERS = {
    "xray": write_xray_shards,
    "tiles": write_tile_shards,
    "ct": write_ct_shards,
    "wsi": write_wsi_shards,
    "video": write_video_shards,
}
