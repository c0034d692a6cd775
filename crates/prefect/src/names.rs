//! Memorable names for flow runs, like Prefect's `crimson-panda`.

const ADJECTIVES: &[&str] = &[
    "amber", "ancient", "azure", "bold", "brave", "bright", "calm", "clever", "cobalt", "crimson", "curious", "daring",
    "dapper", "eager", "electric", "emerald", "fearless", "fiery", "gentle", "golden", "graceful", "happy", "hidden",
    "humble", "icy", "indigo", "jolly", "keen", "lively", "lucky", "magenta", "mellow", "mighty", "misty", "nimble",
    "noble", "olive", "patient", "polite", "quick", "quiet", "rapid", "ruby", "rustic", "scarlet", "silent", "silver",
    "smart", "snowy", "spry", "steady", "sunny", "swift", "tan", "teal", "tidy", "vivid", "warm", "wise", "witty",
    "zealous",
];

const ANIMALS: &[&str] = &[
    "albatross",
    "alpaca",
    "badger",
    "beaver",
    "bison",
    "bobcat",
    "caribou",
    "cheetah",
    "condor",
    "coyote",
    "crane",
    "dingo",
    "dolphin",
    "eagle",
    "falcon",
    "ferret",
    "finch",
    "fox",
    "gazelle",
    "gecko",
    "gibbon",
    "heron",
    "hyena",
    "ibex",
    "jackal",
    "jaguar",
    "kestrel",
    "koala",
    "lemur",
    "leopard",
    "llama",
    "lynx",
    "marmot",
    "mongoose",
    "moose",
    "narwhal",
    "ocelot",
    "okapi",
    "orca",
    "otter",
    "owl",
    "panda",
    "panther",
    "parrot",
    "pelican",
    "penguin",
    "puffin",
    "quail",
    "raccoon",
    "raven",
    "salmon",
    "seal",
    "sparrow",
    "stork",
    "tapir",
    "tiger",
    "toucan",
    "turtle",
    "walrus",
    "wolf",
    "wombat",
    "yak",
    "zebra",
];

/// A random `adjective-animal` name.
pub(crate) fn generate() -> String {
    let pick = |words: &[&'static str]| words[rand::random_range(0..words.len())];
    format!("{}-{}", pick(ADJECTIVES), pick(ANIMALS))
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_an_adjective_and_an_animal() {
        let name = super::generate();
        let (adjective, animal) = name.split_once('-').unwrap();
        assert!(super::ADJECTIVES.contains(&adjective) && super::ANIMALS.contains(&animal), "{name}");
    }
}
