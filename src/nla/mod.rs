//! NLA data: the marker token, chat templates, actor and critic examples and batches.

pub mod actor;
pub mod critic;
pub mod examples;
pub mod extract;
pub mod marker;
pub mod template;

pub use actor::{Actor, ActorInjection, ActorSpec};
pub use critic::{Critic, CriticActs, CriticInput, CriticOut, CriticSpec};
pub use examples::{
    collate_actor, collate_critic, extract_explanation, ActorBatch, ActorEncoder, ActorExample,
    ActorOptions, CriticBatch, CriticEncoder, CriticExample, CriticOptions, LengthLimit, Outcome,
    Skip, SkipCounts,
};
pub use marker::{Marker, MARKER_CODEPOINTS};
pub use template::ChatTemplate;
