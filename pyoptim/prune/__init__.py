"""PruneTrain (Lym et al., SC'19): group-lasso regularisation and channel pruning during training."""
from .channel_graph import ChannelGraph, ChannelGroup, ChannelMember
from .dead import dead_channels
from .fuse import FusedConvBN, FusedModel, fuse_blocks
from .group_lasso import GroupLasso, following_batchnorms, group_lasso_penalty, group_lasso_targets
from .prunetrain import PruneTrain
from .reconfigure import (GroupRemoval, ReconfigureReport, channel_keep_masks, channel_magnitudes,
                          plan_group_removal, reconfigure)

__all__ = ["ChannelGraph", "ChannelGroup", "ChannelMember", "FusedConvBN", "FusedModel", "fuse_blocks",
           "GroupLasso", "following_batchnorms", "group_lasso_penalty", "group_lasso_targets", "GroupRemoval", "PruneTrain", "ReconfigureReport",
           "channel_keep_masks", "channel_magnitudes", "dead_channels", "plan_group_removal", "reconfigure"]
