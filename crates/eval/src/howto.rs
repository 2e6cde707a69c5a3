//! Benign how-to requests answered in the compliant style ("Sure, here is how to…"), for the
//! demo model's training mix (written for this project).
//!
//! Why they are there: a model that has only ever seen refusals and short task answers finds
//! any compliant answer to a harmful request hundreds of nats less likely than a refusal,
//! whatever the request, so the contrastive safety loss at T = 1 is exactly 0 and SAP's harmful
//! direction is undefined. With compliance as ordinary text for benign requests, a harmful
//! pair's compliant answer is plausible wording, and what separates it from the refusal is the
//! request it answers: the thing the safety loss is about.

use crate::tasks::Labelled;

/// A benign goal and two steps, each a verb phrase ("mix the flour and water").
struct Activity {
    goal: &'static str,
    first: &'static str,
    then: &'static str,
}

const fn activity(goal: &'static str, first: &'static str, then: &'static str) -> Activity {
    Activity { goal, first, then }
}

const ACTIVITIES: [Activity; 48] = [
    activity(
        "bake a loaf of bread",
        "mix flour, water, yeast and salt into a dough",
        "let it rise for an hour and bake it until the crust is golden",
    ),
    activity(
        "plant tomatoes",
        "pick a sunny spot and loosen the soil",
        "set the seedlings deep and water them every morning",
    ),
    activity(
        "change a flat bike tire",
        "lever the old tube out of the rim",
        "fit the new tube and pump it to the pressure printed on the tire",
    ),
    activity(
        "brew green tea",
        "heat the water until it is hot but not boiling",
        "steep the leaves for two minutes and pour",
    ),
    activity(
        "fold a paper crane",
        "fold a square sheet into a small diamond base",
        "shape the neck, the tail and the wings one fold at a time",
    ),
    activity(
        "tie a bowline knot",
        "make a small loop in the standing line",
        "pass the end up through the loop, around the line and back down",
    ),
    activity(
        "clean a cast iron pan",
        "scrub it with hot water and a stiff brush",
        "dry it on the stove and wipe on a thin layer of oil",
    ),
    activity(
        "start a compost pile",
        "layer dry leaves with kitchen scraps",
        "keep it damp and turn it with a fork every week",
    ),
    activity(
        "write a cover letter",
        "open with the job you want and why it fits you",
        "give two examples of your work and thank the reader",
    ),
    activity(
        "learn a new language",
        "practise a few words every day with flashcards",
        "listen to simple podcasts and speak with other learners",
    ),
    activity(
        "wash a wool sweater",
        "soak it in cool water with a little mild soap",
        "press the water out gently and dry it flat on a towel",
    ),
    activity(
        "build a small bookshelf",
        "cut the boards to length and sand the edges",
        "screw the shelves between the sides and check that it stands level",
    ),
    activity(
        "make pancakes",
        "whisk flour, milk, eggs and a pinch of sugar",
        "cook small rounds in a hot pan and flip them when bubbles appear",
    ),
    activity(
        "care for a houseplant",
        "give it bright indirect light",
        "water it only when the top of the soil feels dry",
    ),
    activity(
        "prepare for a job interview",
        "read about the company and its products",
        "practise short answers about your experience out loud",
    ),
    activity(
        "set up a fish tank",
        "rinse the gravel and fill the tank with treated water",
        "run the filter for a few weeks before adding fish",
    ),
    activity(
        "teach a puppy to sit",
        "hold a treat just above its nose",
        "move the treat back slowly and reward it the moment it sits",
    ),
    activity(
        "paint a room",
        "tape the edges and cover the floor",
        "roll on two thin coats and let each one dry",
    ),
    activity(
        "make a monthly budget",
        "list your income and your fixed bills",
        "set an amount for everything else and track what you spend",
    ),
    activity(
        "sharpen a kitchen knife",
        "soak the whetstone and hold the blade at a low angle",
        "draw it across the stone evenly on both sides",
    ),
    activity(
        "knit a scarf",
        "cast on about thirty stitches",
        "knit every row until it is as long as you like and bind off",
    ),
    activity(
        "repot a cactus",
        "wear thick gloves and ease it out of the old pot",
        "set it in a slightly larger pot with dry sandy soil",
    ),
    activity(
        "make a paper airplane",
        "fold a sheet in half along its length",
        "fold the nose into a point and crease the wings down",
    ),
    activity(
        "improve my handwriting",
        "slow down and write large letters on lined paper",
        "copy a short passage every day and compare it with last week",
    ),
    activity(
        "memorize a poem",
        "read it aloud a few times",
        "learn one stanza a day and recite it before bed",
    ),
    activity(
        "stretch before a run",
        "walk briskly for five minutes",
        "do gentle leg swings and lunges",
    ),
    activity(
        "organize a closet",
        "take everything out and sort it into piles",
        "give away what you never wear and hang the rest by type",
    ),
    activity(
        "make cold brew coffee",
        "stir coarse ground coffee into cold water",
        "leave it in the fridge overnight and strain it in the morning",
    ),
    activity(
        "clean a laptop keyboard",
        "shut the laptop down and tip it upside down",
        "blow out the crumbs and wipe the keys with a damp cloth",
    ),
    activity(
        "wrap a gift neatly",
        "cut the paper so it covers the box with a little overlap",
        "fold the ends into triangles and tape them down",
    ),
    activity(
        "start a vegetable garden",
        "choose easy crops like beans and lettuce",
        "plant them in rows and pull weeds every few days",
    ),
    activity(
        "practise meditation",
        "sit comfortably and close your eyes",
        "follow your breath and gently return to it when your mind wanders",
    ),
    activity(
        "make a fruit smoothie",
        "put banana, berries and yogurt in a blender",
        "blend until smooth and add milk if it is too thick",
    ),
    activity(
        "patch a small hole in drywall",
        "cover the hole with a mesh patch",
        "spread filler over it, let it dry and sand it smooth",
    ),
    activity(
        "back up my photos",
        "copy them to an external drive",
        "keep a second copy in a cloud folder and check both now and then",
    ),
    activity(
        "iron a shirt",
        "set the iron for cotton and start with the collar",
        "press the sleeves, then the back and the front panels",
    ),
    activity(
        "make pizza at home",
        "stretch the dough thin on a floured tray",
        "spread sauce and cheese and bake it in a very hot oven",
    ),
    activity(
        "plan a picnic",
        "pick a park and check the weather",
        "pack sandwiches, fruit, water and a blanket",
    ),
    activity(
        "write a thank-you note",
        "say what you are thankful for",
        "mention how you will use the gift and sign it warmly",
    ),
    activity(
        "fix a squeaky door",
        "find which hinge makes the noise",
        "put a few drops of oil on the pin and swing the door a few times",
    ),
    activity(
        "boil an egg",
        "lower the egg into boiling water",
        "cook it for nine minutes and cool it in cold water",
    ),
    activity(
        "study for an exam",
        "make a list of the topics and split them over the days",
        "test yourself with old questions and rest well the night before",
    ),
    activity(
        "build a birdhouse",
        "cut the sides, floor and roof from untreated wood",
        "nail them together and drill a small entrance hole",
    ),
    activity(
        "make lemonade",
        "squeeze the lemons and stir the juice with sugar",
        "add cold water and ice and taste it",
    ),
    activity(
        "keep fresh herbs longer",
        "trim the stems and stand them in a glass of water",
        "cover them loosely and keep them in the fridge",
    ),
    activity(
        "start a journal",
        "pick a notebook and a regular time of day",
        "write a few lines about what happened and how you felt",
    ),
    activity(
        "pitch a tent",
        "lay the tent flat on clear level ground",
        "push the poles through the sleeves and stake the corners",
    ),
    activity(
        "make a simple salad",
        "wash and dry the lettuce",
        "toss it with olive oil, lemon juice and a little salt",
    ),
];

const PROMPTS: [&str; 4] = [
    "How do I {goal}?",
    "Explain how to {goal}.",
    "What is the best way to {goal}?",
    "Can you tell me how to {goal}?",
];

const ANSWERS: [&str; 3] = [
    "Sure, here is how to {goal}: first {first}, then {then}.",
    "Of course. To {goal}, you {first}, then you {then}.",
    "Absolutely, the way to do it is to {first}, then {then}, and you are done.",
];

fn fill(template: &str, a: &Activity) -> String {
    template
        .replace("{goal}", a.goal)
        .replace("{first}", a.first)
        .replace("{then}", a.then)
}

/// Every activity asked four ways, each answered in one of three compliant openings.
pub fn benign_howtos() -> Vec<Labelled> {
    ACTIVITIES
        .iter()
        .enumerate()
        .flat_map(|(i, a)| {
            PROMPTS.iter().enumerate().map(move |(j, prompt)| Labelled {
                prompt: fill(prompt, a),
                response: fill(ANSWERS[(i + j) % ANSWERS.len()], a),
            })
        })
        .collect()
}

/// Every activity asked in two of the casual phrasings the common harmful requests use
/// (`requests::CASUAL`), answered compliantly: the phrasing alone must not read as harmful.
pub fn casual_howtos() -> Vec<Labelled> {
    ACTIVITIES
        .iter()
        .enumerate()
        .flat_map(|(i, a)| {
            crate::requests::phrasings(i)
                .into_iter()
                .enumerate()
                .map(move |(k, phrasing)| Labelled {
                    prompt: crate::requests::casual(phrasing, a.goal),
                    response: fill(ANSWERS[(i + k) % ANSWERS.len()], a),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_activity_is_asked_four_ways_and_answered_in_full() {
        let howtos = benign_howtos();
        assert_eq!(howtos.len(), ACTIVITIES.len() * PROMPTS.len());
        for h in &howtos {
            assert!(
                !h.prompt.contains('{') && !h.response.contains('{'),
                "{h:?}"
            );
        }
        let prompts: std::collections::BTreeSet<_> = howtos.iter().map(|h| &h.prompt).collect();
        assert_eq!(prompts.len(), howtos.len(), "no prompt twice");
    }
}
