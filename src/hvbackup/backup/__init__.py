"""The backup application. So far: the repository, a deduplicating store of restore points
(``hvbackup.backup.repository``; its format is described in docs/repository.md)."""
