"""PruneTrain (Lym et al., SC'19): group-lasso regularisation and channel pruning during training."""
from .channel_graph import ChannelGraph, ChannelGroup, ChannelMember
from .group_lasso import GroupLasso, group_lasso_penalty, group_lasso_targets
from .reconfigure import ReconfigureReport, channel_keep_masks, reconfigure

__all__ = ["ChannelGraph", "ChannelGroup", "ChannelMember", "GroupLasso", "group_lasso_penalty",
           "group_lasso_targets", "ReconfigureReport", "channel_keep_masks", "reconfigure"]
