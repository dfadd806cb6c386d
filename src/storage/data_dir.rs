//! The data directory: its lock, and the topics and group state it holds on disk.
//!
//! ```text
//! <data>/LOCK                               flock'ed by the one process that owns the directory
//! <data>/topics/<topic>/topic.toml          the topic's settings (TopicConfig)
//! <data>/topics/<topic>/<partition>/        one partition log per directory, named 0, 1, ...
//! <data>/groups/<group>/<topic>/            a consumer group's state log on one topic
//! <data>/tmp/                               topics being created or deleted
//! ```
//!
//! A topic is created in `tmp/` and renamed into `topics/` once complete, and deleted by the
//! reverse rename, so a crash never leaves a half-made topic behind.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{Error, Result};
use super::io::{FileIo, PRIVATE_DIR, PRIVATE_FILE, create_dir_all, replace_file};
use super::segment::Segment;
use super::topic::{TOPIC_FILE, TopicConfig, validate_group_name, validate_topic_name};

/// A short name for a directory in `tmp/` (file names are limited to 255 bytes; topic and
/// group names may take 249).
fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Takes the data directory's lock (`flock`, exclusive) or fails at once with
/// [`Error::Locked`].
/// How long a held `LOCK` is waited for before [`Error::Locked`]. A lock can stay held for a
/// moment after its holder let go: `flock` belongs to the open file, and a child process forked
/// by any thread of the holder's process shares it until the child's `exec` closes it — so a
/// broker stopped and started again in a process that runs commands could find its own lock
/// still held for as long as a fork takes on a loaded machine.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

fn take_lock(lock: &File, lock_path: &Path) -> Result<()> {
    let until = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::Locked {
                    path: lock_path.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(lock_path, e)),
        }
    }
}

/// An open data directory; holds its `LOCK` for as long as it lives.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    io: Arc<dyn FileIo>,
    _lock: File,
}

/// What a command that reads a data directory says of one that is not (no `topics/`).
pub fn not_a_data_dir(root: &Path) -> String {
    format!(
        "{} is not a Sluice data directory (it has no topics/ directory)",
        root.display()
    )
}

impl DataDir {
    /// Opens (creating if needed) a data directory and takes its lock. Fails with
    /// [`Error::Locked`] when another process holds it (after [`LOCK_PATIENCE`]).
    pub fn open(root: &Path, io: Arc<dyn FileIo>) -> Result<DataDir> {
        // Each new directory's entry is synced into its parent (the root's too, and its own
        // parent's when the root is new): the first topics must not vanish with a power cut.
        for d in [root.join("topics"), root.join("groups"), root.join("tmp")] {
            create_dir_all(io.as_ref(), &d).map_err(|e| Error::io(&d, e))?;
        }
        // A data directory made by hand, or by an older version, becomes private too.
        fs::set_permissions(root, fs::Permissions::from_mode(PRIVATE_DIR))
            .map_err(|e| Error::io(root, e))?;
        let lock_path = root.join("LOCK");
        let new_lock = !lock_path.exists();
        let lock = io
            .create_file(
                &lock_path,
                OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(PRIVATE_FILE),
            )
            .map_err(|e| Error::io(&lock_path, e))?;
        if new_lock {
            io.sync_dir(root).map_err(|e| Error::io(root, e))?;
        }
        take_lock(&lock, &lock_path)?;
        // Leftovers of interrupted creations and deletions.
        let tmp = root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))? {
            let path = entry.map_err(|e| Error::io(&tmp, e))?.path();
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(|e| Error::io(&path, e))?;
        }
        Ok(DataDir {
            root: root.to_path_buf(),
            io,
            _lock: lock,
        })
    }

    /// Opens an existing data directory without changing anything in it (a dry run): refuses a
    /// directory that is not one, creates and removes nothing, and takes the lock through the
    /// existing `LOCK` file, so that no broker changes the files while they are read. Every
    /// write through [`DataDir::io`] fails: `io` should be a [`super::ReadOnlyIo`].
    pub fn open_read_only(root: &Path, io: Arc<dyn FileIo>) -> Result<DataDir> {
        if !super::verify::is_data_dir(root) {
            return Err(Error::InvalidConfig(not_a_data_dir(root)));
        }
        let lock_path = root.join("LOCK");
        let lock = File::open(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        take_lock(&lock, &lock_path)?;
        Ok(DataDir {
            root: root.to_path_buf(),
            io,
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn io(&self) -> &Arc<dyn FileIo> {
        &self.io
    }

    fn topics_dir(&self) -> PathBuf {
        self.root.join("topics")
    }

    /// The directory of a topic (the name must be valid).
    pub fn topic_dir(&self, topic: &str) -> Result<PathBuf> {
        validate_topic_name(topic)?;
        Ok(self.topics_dir().join(topic))
    }

    pub fn partition_dir(&self, topic: &str, partition: u32) -> Result<PathBuf> {
        Ok(self.topic_dir(topic)?.join(partition.to_string()))
    }

    /// Creates a topic with its partition directories; atomic by rename.
    pub fn create_topic(&self, topic: &str, config: &TopicConfig) -> Result<()> {
        self.create_topic_at(topic, config, &[], 0)
    }

    /// Creates a topic whose partition `p` starts at offset `first_offsets[p]` (0 when not
    /// given: its first segment is made on open): a cluster node creating its replica of a
    /// topic adopted from a single node's data, whose log may start later (docs/replication.md).
    /// `index_capacity` sizes those first segments' indexes.
    pub fn create_topic_at(
        &self,
        topic: &str,
        config: &TopicConfig,
        first_offsets: &[u64],
        index_capacity: usize,
    ) -> Result<()> {
        config.sanitize()?;
        let dest = self.topic_dir(topic)?;
        if dest.exists() {
            return Err(Error::TopicExists(topic.to_string()));
        }
        let staging = self.root.join("tmp").join(topic);
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        }
        create_dir_all(self.io.as_ref(), &staging).map_err(|e| Error::io(&staging, e))?;
        let text = toml::to_string(config)
            .map_err(|e| Error::InvalidConfig(format!("cannot encode topic config: {e}")))?;
        let file = staging.join(TOPIC_FILE);
        replace_file(self.io.as_ref(), &file, text.as_bytes()).map_err(|e| Error::io(&file, e))?;
        for p in 0..config.partitions {
            let d = staging.join(p.to_string());
            self.io.create_dir(&d).map_err(|e| Error::io(&d, e))?;
            if let Some(&base) = first_offsets.get(p as usize).filter(|&&b| b > 0) {
                Segment::create(&d, base, index_capacity, self.io.as_ref())?;
                self.io.sync_dir(&d).map_err(|e| Error::io(&d, e))?;
            }
        }
        self.io
            .sync_dir(&staging)
            .map_err(|e| Error::io(&staging, e))?;
        self.io
            .rename(&staging, &dest)
            .map_err(|e| Error::io(&dest, e))?;
        let topics = self.topics_dir();
        self.io
            .sync_dir(&topics)
            .map_err(|e| Error::io(&topics, e))?;
        Ok(())
    }

    /// Reads a topic's settings.
    pub fn topic_config(&self, topic: &str) -> Result<TopicConfig> {
        let dir = self.topic_dir(topic)?;
        let file = dir.join(TOPIC_FILE);
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::TopicNotFound(topic.to_string()));
            }
            Err(e) => return Err(Error::io(&file, e)),
        };
        let config: TopicConfig =
            toml::from_str(&text).map_err(|e| Error::corrupt(&file, 0, e.to_string()))?;
        config.sanitize()?;
        Ok(config)
    }

    /// Replaces a topic's settings (the partition count cannot change).
    pub fn set_topic_config(&self, topic: &str, config: &TopicConfig) -> Result<()> {
        let old = self.topic_config(topic)?;
        config.sanitize()?;
        if old.partitions != config.partitions {
            return Err(Error::InvalidConfig(
                "the number of partitions of a topic cannot change".into(),
            ));
        }
        let file = self.topic_dir(topic)?.join(TOPIC_FILE);
        let text = toml::to_string(config)
            .map_err(|e| Error::InvalidConfig(format!("cannot encode topic config: {e}")))?;
        replace_file(self.io.as_ref(), &file, text.as_bytes()).map_err(|e| Error::io(&file, e))
    }

    /// Names of all topics, sorted.
    pub fn list_topics(&self) -> Result<Vec<String>> {
        let dir = self.topics_dir();
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            if let Some(name) = entry.file_name().to_str()
                && validate_topic_name(name).is_ok()
                && entry.path().join(TOPIC_FILE).exists()
            {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn groups_dir(&self) -> PathBuf {
        self.root.join("groups")
    }

    /// The directory holding a group's state for a topic (a partition log).
    pub fn group_dir(&self, group: &str, topic: &str) -> Result<PathBuf> {
        validate_group_name(group)?;
        validate_topic_name(topic)?;
        Ok(self.groups_dir().join(group).join(topic))
    }

    /// Every group with the topics it has state for, sorted.
    pub fn list_groups(&self) -> Result<Vec<(String, Vec<String>)>> {
        let dir = self.groups_dir();
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(&dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let Some(group) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if validate_group_name(&group).is_err() {
                continue;
            }
            let mut topics = Vec::new();
            let gdir = entry.path();
            for t in fs::read_dir(&gdir).map_err(|e| Error::io(&gdir, e))? {
                let t = t.map_err(|e| Error::io(&gdir, e))?;
                if let Some(name) = t.file_name().to_str()
                    && validate_topic_name(name).is_ok()
                {
                    topics.push(name.to_string());
                }
            }
            // A group whose last topic's state was deleted (a crash can leave its directory).
            if topics.is_empty() {
                continue;
            }
            topics.sort();
            out.push((group, topics));
        }
        out.sort();
        Ok(out)
    }

    /// Deletes a group's state for one topic, or for every topic when `topic` is `None`.
    pub fn delete_group_state(&self, group: &str, topic: Option<&str>) -> Result<()> {
        validate_group_name(group)?;
        let dir = match topic {
            Some(t) => self.group_dir(group, t)?,
            None => self.groups_dir().join(group),
        };
        if !dir.exists() {
            return Err(Error::GroupNotFound(group.to_string()));
        }
        let doomed = self.root.join("tmp").join(unique_name("deleted-group"));
        if doomed.exists() {
            fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
        }
        self.io
            .rename(&dir, &doomed)
            .map_err(|e| Error::io(&dir, e))?;
        let parent = dir.parent().unwrap_or(&self.root).to_path_buf();
        self.io
            .sync_dir(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
        if topic.is_some() {
            // The group's directory goes with its last topic (it fails, harmlessly, while
            // another topic's state is in it).
            let _ = fs::remove_dir(&parent);
        }
        Ok(())
    }

    /// Deletes a topic and all its data. Its partitions must be closed first.
    pub fn delete_topic(&self, topic: &str) -> Result<()> {
        let dir = self.topic_dir(topic)?;
        if !dir.join(TOPIC_FILE).exists() {
            return Err(Error::TopicNotFound(topic.to_string()));
        }
        let doomed = self.root.join("tmp").join(unique_name("deleted-topic"));
        if doomed.exists() {
            fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
        }
        self.io
            .rename(&dir, &doomed)
            .map_err(|e| Error::io(&dir, e))?;
        let topics = self.topics_dir();
        self.io
            .sync_dir(&topics)
            .map_err(|e| Error::io(&topics, e))?;
        fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::RealIo;

    #[test]
    fn topics_are_created_listed_read_and_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::open(tmp.path(), Arc::new(RealIo)).unwrap();
        let cfg = TopicConfig {
            partitions: 3,
            retention_ms: Some(1000),
            ..TopicConfig::default()
        };
        dd.create_topic("prom.v1", &cfg).unwrap();
        assert!(matches!(
            dd.create_topic("prom.v1", &cfg),
            Err(Error::TopicExists(_))
        ));
        assert!(matches!(
            dd.create_topic("../x", &cfg),
            Err(Error::InvalidTopicName { .. })
        ));
        assert_eq!(dd.list_topics().unwrap(), vec!["prom.v1".to_string()]);
        assert_eq!(dd.topic_config("prom.v1").unwrap(), cfg);
        assert!(dd.partition_dir("prom.v1", 2).unwrap().is_dir());
        dd.delete_topic("prom.v1").unwrap();
        assert!(dd.list_topics().unwrap().is_empty());
        assert!(matches!(
            dd.topic_config("prom.v1"),
            Err(Error::TopicNotFound(_))
        ));
    }

    #[test]
    fn a_second_owner_of_the_data_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let _first = DataDir::open(tmp.path(), Arc::new(RealIo)).unwrap();
        assert!(matches!(
            DataDir::open(tmp.path(), Arc::new(RealIo)),
            Err(Error::Locked { .. })
        ));
    }
}
