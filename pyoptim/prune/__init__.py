"""PruneTrain (Lym et al., SC'19): group-lasso regularisation and channel pruning during training."""
from .channel_graph import ChannelGraph, ChannelGroup, ChannelMember
from .channel_rules import ChannelRule, register_channel_op, register_channel_param, unregister_channel_op
from .dead import dead_channels
from .fuse import FusedConvBN, FusedModel, fuse_blocks
from .group_lasso import GroupLasso, following_batchnorms, group_lasso_penalty, group_lasso_targets
from .prunetrain import PruneTrain
from .counted_norm import CountedLayerNorm
from .verify import verify_pruning
from .reconfigure import (GroupRemoval, ReconfigureReport, channel_keep_masks, channel_magnitudes,
                          plan_group_removal, reconfigure)

__all__ = ["ChannelGraph", "ChannelGroup", "ChannelMember", "ChannelRule", "register_channel_op",
           "register_channel_param", "unregister_channel_op", "CountedLayerNorm", "verify_pruning", "FusedConvBN", "FusedModel", "fuse_blocks",
           "GroupLasso", "following_batchnorms", "group_lasso_penalty", "group_lasso_targets", "GroupRemoval", "PruneTrain", "ReconfigureReport",
           "channel_keep_masks", "channel_magnitudes", "dead_channels", "plan_group_removal", "reconfigure"]
